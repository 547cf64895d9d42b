"""The gRPC API of `scc serve --grpc-port P` (Ray Serve's gRPC ingress), without generated code: the messages are
built from PROTO's descriptor at import, so neither the server nor a Python client needs protoc.

    channel = grpc.insecure_channel("127.0.0.1:9000")        # or grpc.secure_channel(..., credentials) with TLS
    reply = classify_call(channel)(ClassifyRequest(images=[Image(data=png, key="7")], top_k=3),
                                   metadata=[("authorization", "Bearer " + token)])
    json.loads(reply.json)          # the same answer as POST /v1/classify

Errors are gRPC status codes with the one-line reason as details and the stable code of the HTTP answer as trailing
metadata `scc-error-code`: 400 -> INVALID_ARGUMENT, 401 -> UNAUTHENTICATED, 403 -> PERMISSION_DENIED,
408 -> DEADLINE_EXCEEDED, 413 -> RESOURCE_EXHAUSTED, 415 -> INVALID_ARGUMENT, 429 -> RESOURCE_EXHAUSTED (retryable;
`retry-after`), 503 -> UNAVAILABLE (retryable; trailing metadata `retry-after`), 500 -> INTERNAL. A message larger
than the server's body limit is refused by gRPC itself (RESOURCE_EXHAUSTED) before it reaches the service. With
--tls-cert the port speaks TLS: `grpc.secure_channel(target, grpc.ssl_channel_credentials(cert))`. Other languages:
compile PROTO.
"""
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "scc.v1.Classifier"
METHOD = f"/{SERVICE}/Classify"
PROTO = """syntax = "proto3";
package scc.v1;
message Image { bytes data = 1; string name = 2; string key = 3; }
message ClassifyRequest { repeated Image images = 1; uint32 top_k = 2; string seed = 3; }
message ClassifyReply { string json = 1; }          // the JSON answer of POST /v1/classify
service Classifier { rpc Classify(ClassifyRequest) returns (ClassifyReply); }
"""


def _messages():
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="scc/v1/classifier.proto", package="scc.v1", syntax="proto3")
    fields = {"Image": [("data", F.TYPE_BYTES, None), ("name", F.TYPE_STRING, None), ("key", F.TYPE_STRING, None)],
              "ClassifyRequest": [("images", F.TYPE_MESSAGE, ".scc.v1.Image"), ("top_k", F.TYPE_UINT32, None),
                                  ("seed", F.TYPE_STRING, None)],
              "ClassifyReply": [("json", F.TYPE_STRING, None)]}
    for name, spec in fields.items():
        m = fdp.message_type.add(name=name)
        for number, (field, kind, type_name) in enumerate(spec, 1):
            f = m.field.add(name=field, number=number, type=kind,
                            label=F.LABEL_REPEATED if field == "images" else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = type_name
    service = fdp.service.add(name="Classifier")
    service.method.add(name="Classify", input_type=".scc.v1.ClassifyRequest", output_type=".scc.v1.ClassifyReply")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"scc.v1.{n}")) for n in fields)


Image, ClassifyRequest, ClassifyReply = _messages()
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
          500: "INTERNAL", 503: "UNAVAILABLE"}


def add_ClassifierServicer_to_server(servicer, server) -> None:
    """The `grpc_servicer_functions` entry Ray Serve's gRPC proxy imports: registers scc.v1.Classifier/Classify.
    Requests reach the deployment as raw bytes, parsed there only after the token and the size are checked
    (scc.serve.front.Front.classify_grpc)."""
    import grpc

    handler = grpc.unary_unary_rpc_method_handler(servicer.Classify, request_deserializer=None,
                                                  response_serializer=ClassifyReply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Classify": handler}),))


def classify_call(channel):
    """A client stub: call(ClassifyRequest, metadata=..., timeout=...) -> ClassifyReply."""
    return channel.unary_unary(METHOD, request_serializer=ClassifyRequest.SerializeToString,
                               response_deserializer=ClassifyReply.FromString)


def request_query(request) -> dict[str, list[str]]:
    """A ClassifyRequest's keys, top_k and seed as the query values of POST /v1/classify."""
    query: dict[str, list[str]] = {}
    keys = [im.key for im in request.images]
    if any(keys):
        query["key"] = [",".join(k.replace(",", "") for k in keys)]
    if request.top_k:
        query["top_k"] = [str(request.top_k)]
    if request.seed:
        query["seed"] = [request.seed]
    return query
