"""Project tools run by ``make``: not part of the installed package."""
