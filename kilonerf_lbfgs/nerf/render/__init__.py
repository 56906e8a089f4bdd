"""Volume rendering (``volrend``), the occupancy grid (``occupancy``), ray marching with
empty-space skipping on the torch or nerfacc backend (``marcher``), and rendering a field
along rays (``rendering``)."""
