"""The Textual workbench: screens over the same core services as the CLI."""
