"""Cross-checks of minidp against deepmd-kit: ``python -m validation.crosscheck`` (see README.md here).

- :mod:`validation.cases`: the geometries and the ``type_one_side: false`` model the checks run on;
- :mod:`validation.compare`: evaluating both implementations and measuring how far apart they are;
- :mod:`validation.reporting`: report.md, report.json and the parity plots;
- :mod:`validation.crosscheck`: the command that runs it all.
"""
