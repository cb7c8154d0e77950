"""The one base class of every error a user's input can cause.

Why this module exists. A researcher's script, a notebook and the ``sinkscope`` command all
need to tell "you asked for something that cannot be done" (a misspelt model, a layer out of
range, a prompts file that is not JSON) from a bug. Every such error in the three packages
derives from :class:`SinkscopeError`, so the command catches one class, prints one line and
exits with code 2, and a script can do the same. Each subclass names the rule that was broken
(:class:`circuits.model_errors.UnknownModelError`, :class:`interventions.base.InterventionError`, ...);
this module imports nothing, so the command can import it before torch.
"""


class SinkscopeError(Exception):
    """Base of sinkscope's user errors: bad input, not a bug. The message says what to change."""


__all__ = ["SinkscopeError"]
