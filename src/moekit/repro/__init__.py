"""The reproduction app: paper experiments (``moekit run``), the papers' own models, the embedded
datasets and the navigation environment. Kept apart from the library (``moekit.routing``,
``moekit.layers``, …): it builds on the library and the library never imports it.

Install its extra dependencies with ``pip install "moekit[experiments]"``.
"""
