"""The docs runner: every command block in README.md and docs/*.md, collected and run as written.

``blocks`` collects the fenced blocks and the one-line annotation before each; ``flags`` checks the
``embedstream`` commands of a block against each subcommand's ``--help``; ``runner`` runs a block in
a fresh working directory against what its annotation says it needs; ``figures`` holds the docs'
figures to the command or commit that measured them.
"""
