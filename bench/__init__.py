"""`make bench`: measurements side by side with the obvious alternative, in one run."""
