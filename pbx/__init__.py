"""pbx: a SIP/VoIP telephony server with IVR, queues and callbacks."""

__version__ = "0.1.0"
