"""Salvo's own protobuf descriptor pool.

Salvo's stubs use package `inference`, as the v2 protocol requires, and so does
tritonclient. Registering ours in a private pool lets both live in one process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
