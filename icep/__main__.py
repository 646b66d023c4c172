from icep.app import main

main()
