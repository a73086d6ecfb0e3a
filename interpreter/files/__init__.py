"""Files of sessions: names, and (with the sessions issue) upload, mounting and collection."""
