from phi3cli.cli import main

main()
