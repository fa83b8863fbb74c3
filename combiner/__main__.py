from combiner.cli import main

main()
