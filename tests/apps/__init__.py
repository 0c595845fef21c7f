"""Small applications that the framework tests serve with real servers (and with test clients)."""
