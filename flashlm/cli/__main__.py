from flashlm.cli import main

main()
