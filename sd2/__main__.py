from sd2.cli import main

main()
