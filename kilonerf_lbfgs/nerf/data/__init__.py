"""Posed images and rays: the Blender and instant-ngp loaders (``loaders``), camera rays and
the training ray bank (``rays``), and the generated demo scene (``demo_scene``)."""
