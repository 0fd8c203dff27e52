"""Frames, the ring buffer, the ZMQ frame protocol, stacks, the OME-Zarr sink and the run loop.

Never imports torch or Qt.
"""
