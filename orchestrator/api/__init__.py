"""Talking to the dreamlook.ai API: the HTTP client, retry policies, the request budget, the job object, callbacks."""
