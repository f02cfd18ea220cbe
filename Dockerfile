# Octoplex in a small, non-root image.
#
#   docker build -t octoplex .
#   docker run --rm -p 127.0.0.1:8080:8080 octoplex
#   curl -s localhost:8080/healthz
#
# The image runs the README's quick-start command, with two differences that
# tests/test_deploy.py allows and checks (CI does not build this image; that
# test ties it to the commands CI runs):
#   - it listens on all of the container's interfaces (`--listen
#     tcp:8080:backlog=1024`, the daemon's own default listener), since a
#     published port reaches the container from outside it;
#   - it does not pass `--allow-egress 127.0.0.0/8`: the default egress
#     policy refuses loopback, private, link-local and cloud metadata
#     addresses, so the image is safe by default.
#
# Arguments after the image name replace the whole command, so give it in
# full. To let Octoplex call upstreams in a private range, add
# `--allow-egress CIDR` (and `--deny-egress CIDR` for what must stay out):
#
#   docker run --rm -p 127.0.0.1:8080:8080 octoplex \
#     /opt/octoplex/venv/bin/twistd -n --pidfile= octoplex \
#     --listen tcp:8080:backlog=1024 \
#     --allow-egress 10.20.0.0/16 --deny-egress 10.20.99.0/24
#
# `docker run --rm octoplex twistd octoplex --help` lists every option.

# The build stage installs Octoplex into a virtualenv at the path it keeps
# in the runtime stage (a virtualenv is not relocatable), so neither the
# source nor pip's cache ends up in the image.
FROM python:3.11-slim AS build

WORKDIR /src
# setup.py reads README.md (the long description); pyproject.toml holds
# tool settings only. Copying these paths, not `.`, keeps a local .venv,
# .tox or build/ out of the image.
COPY setup.py pyproject.toml README.md ./
COPY octoplex ./octoplex
COPY twisted ./twisted

# The README's install step, verbatim but for the virtualenv's path.
RUN python3 -m venv /opt/octoplex/venv && /opt/octoplex/venv/bin/pip install .

# Write twisted/plugins/dropin.cache now, as root: twistd finds the
# `octoplex` plugin through it, and the non-root user below cannot write
# into the virtualenv (nor can anyone, on a read-only root filesystem).
# Run from / so that the source's twisted/ directory is not on the path.
WORKDIR /
RUN /opt/octoplex/venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


FROM python:3.11-slim

# A numeric user, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 octoplex \
    && useradd --system --uid 10001 --gid octoplex --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin octoplex

COPY --from=build /opt/octoplex/venv /opt/octoplex/venv

# pip compiled the bytecode at install time; never try to write more.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/octoplex/venv/bin:$PATH

USER 10001:10001
WORKDIR /
EXPOSE 8080

# The slim image has no curl: ask /healthz with Python's urllib.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/octoplex/venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

# The README's start command, on all interfaces and with no --allow-egress.
# twistd stops on SIGTERM (docker stop), so no init process is needed.
CMD ["/opt/octoplex/venv/bin/twistd", "-n", "--pidfile=", "octoplex", "--listen", "tcp:8080:backlog=1024"]
