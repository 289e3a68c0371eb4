"""Accounts of the controller: users, roles, sessions, API tokens and the guard on every route.

Split so that the decisions are pure and testable on their own (``roles``: which permission a
role holds and which permission a request needs; ``ratelimit``: whether a login may be tried),
the state lives in SQL (``models``, ``store``), and HTTP is one edge (``web``: the middleware that
authenticates every request, checks CSRF and the role, and the login/logout pages).
"""
