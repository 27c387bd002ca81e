"""Ray Serve HTTP endpoint for DFNet inpainting (`serve run serve/config.yaml`).

The application lives in :mod:`serve.app`; it is not imported here so that importing the
package (e.g. to find ``serve/static``) does not pull in Ray and PyTorch.
"""
