"""Small helpers shared by every sub-package: the cache root, progress lines, sha256, manifests.

This package sits lowest on the data's path (below ``model``) and imports nothing else from sparsetrace
except :mod:`sparsetrace.errors`.
"""
