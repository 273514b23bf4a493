"""esci-workbench UI layer: the Typer CLI (and, later, the Textual app) over core."""
