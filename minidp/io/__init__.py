"""Model files and data: reading and checking models, reading systems, writing outputs safely, figures."""
