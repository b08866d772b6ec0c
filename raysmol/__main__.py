from raysmol.cli import main

main()
