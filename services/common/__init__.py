"""The chassis shared by every Parley service: settings, logging, database, auth, server bootstrap."""
