"""`python -m gateway.chat`: an alias of `python -m clients.chat` (the terminal client)."""

from clients.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
