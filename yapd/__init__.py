"""yapd: realtime text inference daemon for voice agents."""

__version__ = "0.1.0"
