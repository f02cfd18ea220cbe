from twisted.application.service import ServiceMaker

octoplex = ServiceMaker(
    "Octoplex",
    "octoplex.tap",
    "An HTTP request multiplexer: one JSON batch in, parallel upstream requests out.",
    "octoplex",
)
