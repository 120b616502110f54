from cli.main import main

# Guarded: the worker's encoder processes (`spawn`) import this module again, and must not rerun the CLI.
if __name__ == "__main__":
    main()
