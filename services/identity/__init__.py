"""Identity: users, contacts, events and properties, and the resolved-event stream."""
