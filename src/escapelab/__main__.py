from escapelab.cli import main

main()
