"""The session record, its msgpack encoding and the service's errors: the lowest layer.

Everything above imports from here; nothing here imports anything else of the project.
"""
