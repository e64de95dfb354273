from sd3exp.cli import main

main()
