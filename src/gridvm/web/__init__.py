"""gridvm.web: the browser console that gridvmd serves (its routes and static files)."""
