"""The backend-free core: frames, the executor protocol, configuration, policies, runtime.

Nothing under ``wove_adapters.core`` may import a job-system library (celery, ray, ...).
"""
