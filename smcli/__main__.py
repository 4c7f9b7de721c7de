from smcli.cli import main

main()
