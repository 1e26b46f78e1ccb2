"""TLS material and listener settings for the local broker's secure listeners (``start --tls``).

A throw-away CA signs a server certificate for 127.0.0.1 and localhost (SAN), a second
server certificate that names another host (for hostname-check tests) and a client
certificate for mTLS. openssl makes the keys and certificates and the servers' PKCS#12
keystores; keytool makes the broker's truststore. Nothing here is meant for production:
the passwords are random per run and written beside the files, in the broker's run folder.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_USER = "alice"
WRONG_HOST = "not-this-broker.invalid"


class TlsSetupError(RuntimeError):
    """openssl or keytool is missing or failed."""


@dataclass(frozen=True)
class TlsMaterial:
    """Files and passwords of one run: PEM for Python clients, keystores for the broker."""

    ca_file: Path
    client_cert_file: Path
    client_key_file: Path  # encrypted with client_key_password
    client_key_password: str
    keystore: Path  # PKCS#12: server key and certificate for 127.0.0.1 / localhost
    wrong_host_keystore: Path  # PKCS#12: a certificate that names WRONG_HOST only
    truststore: Path  # PKCS#12: the CA, to verify client certificates (mTLS)
    store_password: str
    sasl_password: str


def _run(*cmd: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise TlsSetupError(f"'{cmd[0]}' is not on PATH; --tls needs openssl and keytool (Java 17+)")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TlsSetupError(f"{cmd[0]} {cmd[1]} failed: {done.stderr.strip()[-1000:]}")


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, 30 days): its certificate and key files."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", f"/CN=fraud-pipeline test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def issue(ca: tuple[Path, Path], folder: Path, name: str, san: str, usage: str) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` with subjectAltName ``san``; ``usage`` is serverAuth or clientAuth."""
    cert, key, csr, ext = (folder / f"{name}.pem", folder / f"{name}-key.pem", folder / f"{name}.csr",
                           folder / f"{name}.ext")
    _run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-out", str(cert), "-days", "30", "-extfile", str(ext))
    return cert, key


def _keystore(cert: Path, key: Path, ca: Path, out: Path, password: str) -> Path:
    _run("openssl", "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-certfile", str(ca),
         "-name", "broker", "-out", str(out), "-passout", f"pass:{password}")
    return out


def make_material(folder: Path) -> TlsMaterial:
    """Everything the secure listeners and their clients need, under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    store_password, key_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    ca = make_ca(folder)
    server = issue(ca, folder, "server", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    wrong = issue(ca, folder, "wrong-host", f"DNS:{WRONG_HOST}", "serverAuth")
    client_cert, plain_key = issue(ca, folder, "client", "DNS:fraud-pipeline-client", "clientAuth")
    client_key = folder / "client-key-encrypted.pem"
    _run("openssl", "pkey", "-in", str(plain_key), "-aes256", "-passout", f"pass:{key_password}",
         "-out", str(client_key))
    plain_key.unlink()
    truststore = folder / "truststore.p12"
    _run("keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", str(ca[0]), "-keystore", str(truststore),
         "-storetype", "PKCS12", "-storepass", store_password)
    return TlsMaterial(
        ca_file=ca[0], client_cert_file=client_cert, client_key_file=client_key, client_key_password=key_password,
        keystore=_keystore(*server, ca[0], folder / "server.p12", store_password),
        wrong_host_keystore=_keystore(*wrong, ca[0], folder / "wrong-host.p12", store_password),
        truststore=truststore, store_password=store_password, sasl_password=secrets.token_urlsafe(12),
    )


# listener name -> security protocol; their ports follow the plaintext one's in BrokerState
LISTENERS = {"SSL": "SSL", "MTLS": "SSL", "SASL_SSL": "SASL_SSL", "WRONGHOST": "SSL"}


def listener_properties(ports: dict[str, int], tls: TlsMaterial) -> str:
    """server.properties lines for the secure listeners (appended to the plaintext broker's)."""
    stores = (f"ssl.keystore.type=PKCS12\nssl.keystore.location={tls.keystore}\n"
              f"ssl.keystore.password={tls.store_password}\nssl.key.password={tls.store_password}\n"
              f"ssl.truststore.type=PKCS12\nssl.truststore.location={tls.truststore}\n"
              f"ssl.truststore.password={tls.store_password}\n")
    scram = "".join(f"listener.name.sasl_ssl.{m.lower()}.sasl.jaas.config="
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;\n" for m in SCRAM_MECHANISMS)
    plain = ("listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
             f'required user_{SASL_USER}="{tls.sasl_password}";\n')
    return (stores + scram + plain
            + f"sasl.enabled.mechanisms=PLAIN,{','.join(SCRAM_MECHANISMS)}\n"
            + "listener.name.mtls.ssl.client.auth=required\n"
            + f"listener.name.wronghost.ssl.keystore.location={tls.wrong_host_keystore}\n"
            + f"listener.name.wronghost.ssl.keystore.password={tls.store_password}\n"
            + f"listener.name.wronghost.ssl.key.password={tls.store_password}\n"
            + "listener.name.wronghost.ssl.keystore.type=PKCS12\n")


def scram_arguments(tls: TlsMaterial) -> list[str]:
    """kafka-storage format arguments that create the SCRAM user at format time (KRaft)."""
    args = []
    for mechanism in SCRAM_MECHANISMS:
        args += ["--add-scram", f"{mechanism}=[name={SASL_USER},password={tls.sasl_password}]"]
    return args
