"""The axguard.v1 stubs, generated into the client distribution and re-exported here.

`from axguard.v1 import confidence_pb2` keeps working on the server side; the files live in
clients/python/axguard_client/v1 so a pipeline gets them without installing the server.
"""

from axguard_client.v1 import confidence_pb2, confidence_pb2_grpc

__all__ = ["confidence_pb2", "confidence_pb2_grpc"]
