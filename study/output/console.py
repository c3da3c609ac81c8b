"""The study's lines on the console, for the researcher watching it."""


def say(text: str) -> None:
    """A line for the researcher watching the console (flushed: Ray jobs stream it)."""
    print(text, flush=True)
