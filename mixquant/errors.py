"""The one error type mixquant reports to users as a single line."""


class MixquantError(ValueError):
    """Bad input or an impossible request; the message names the file or value and the problem."""
