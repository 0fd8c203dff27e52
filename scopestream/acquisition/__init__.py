"""Frame sources: simulated microscope, replay of recordings, remote (ZMQ) frames."""
