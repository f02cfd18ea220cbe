from setuptools import setup

GRPC = [
    "grpcio>=1.85.1",
    "protobuf>=7.35.1,<8",
    "grpcio-health-checking>=1.85.1",
    "grpcio-reflection>=1.85.1",
]

setup(
    name="octoplex",
    version="0.1.0",
    description="An HTTP request multiplexer: a JSON batch in, parallel requests out.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["octoplex", "octoplex.v1", "twisted.plugins"],
    include_package_data=False,
    # The gRPC API's definition, next to the modules generated from it.
    package_data={"octoplex.v1": ["multiplexer.proto", "*.pyi"]},
    install_requires=[
        # 26.10 is the lowest Twisted tested (tox -e lowest): older ones
        # mutate a used TLS context, which pyOpenSSL 26.2 and later refuse,
        # so their HTTPS servers fail every handshake (twisted#12639).
        # Below 27: octoplex.pool, .agent, .errors, .inbound and .web build
        # on private Twisted parts (tests/test_private_api.py); a new major
        # release is taken once that test passes on it.
        "twisted[tls]>=26.10.0,<27",
        "treq>=24.9.1",
        "klein>=24.8.0",
        "service-identity>=24.2.0",
        "pyopenssl>=24.2.1",
        "attrs>=23.1.0",
        # The upstream response parser (octoplex.http11): llhttp, in C.
        "httptools>=0.6.4",
        # /metrics and /stats (octoplex.metrics).
        "prometheus-client>=0.20",
        # The config file: tomllib is in the standard library from 3.11.
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # HTTP/2 on the HTTPS listener, negotiated by ALPN (the h2 package).
        "http2": ["twisted[http2]"],
        # The gRPC listener (--grpc-listen): octoplex/v1's generated modules
        # need at least the grpcio and protobuf they were generated for.
        "grpc": GRPC,
        # What bench/ needs beyond the standard library: the gRPC frontend
        # (grpc_vs_http.py), the TLS scenario's certificates, and the plain
        # aiohttp multiplexer that peers.py runs beside Octoplex.
        "bench": [*GRPC, "trustme>=1.1", "aiohttp>=3.9"],
        "test": [
            *GRPC,
            # Generates octoplex/v1's modules again, to check the committed
            # ones match the .proto (tests/test_grpc_proto.py): exactly the
            # version they were generated with.
            "grpcio-tools==1.85.1",
            # The HTTPS listener's HTTP/2 is tested, with h2 as the client.
            "twisted[http2]",
            "pytest>=8",
            "pytest-twisted>=1.14",
            # A per-test timeout (pyproject.toml): a hanging test fails, not the run.
            "pytest-timeout>=2.3",
            "trustme>=1.1",
            "hypothesis>=6.100",
            # tests/test_deploy.py reads the compose file and the manifests.
            "pyyaml>=6.0",
            # Every answer the tests receive is checked against octoplex.schema.
            "jsonschema>=4.18",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
