"""The HTTP face: the app, its routes and handlers, the admin endpoints, the services they share."""
