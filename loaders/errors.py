"""Why an export did not load: refused (quarantined) or not readable now (retried)."""

from __future__ import annotations


class LoadError(Exception):
    """An export that cannot become a version; the message is the reason shown to operators."""


class Unavailable(Exception):
    """The source could not be read right now (an outage, an export still changing): not the
    export's fault, so it is tried again later instead of being refused."""
