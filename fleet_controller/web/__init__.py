"""What people and tools see of the controller: the REST API, the app factory, logins and the dashboard."""
