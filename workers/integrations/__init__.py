"""The service inside web frameworks: ASGI middleware (:mod:`.asgi`) and a Django session engine
(:mod:`.django`).

Each module imports only what it needs: the ASGI middleware no framework at all, the Django
engine Django (the ``[django]`` extra). Neither loads the embedded service unless given one.
"""
