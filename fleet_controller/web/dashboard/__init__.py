"""The operators' dashboard: server-rendered pages, a small vanilla-JS layer and live updates.

Pages are rendered on the server from SQL queries that paginate, filter and sort in the
database (so the fleet page stays fast at thousands of shops); the browser script only adds
live updates (server-sent events), table refreshes and the buttons that call the JSON API.
Everything is served by the controller itself: no CDN, works offline.
"""
