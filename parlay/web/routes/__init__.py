"""The web app's routes, one router per audience: ``pages`` (the HTML pages), ``participant``
(``/api/me``, consent, check, games and moves) and ``admin`` (``/api/admin/*``). Each reads the
app's ``WebState`` through a dependency (``parlay.web.state``)."""
