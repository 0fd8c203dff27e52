from scopestream.cli import main

main()
