// A gRPC service on @grpc/grpc-js for the rolling-restart rig: one unary method,
// /shop.Checkout/Pay, answering after about 2 ms of work, and on SIGTERM the graceful stop gRPC
// servers use, tryShutdown(): stop accepting, GOAWAY on every connection, finish the calls
// under way, then exit. No .proto: the method is declared with identity (de)serializers, so the
// messages are raw bytes.
"use strict";
const grpc = require("@grpc/grpc-js");

const port = Number(process.argv[process.argv.indexOf("--port") + 1] || 8080);
const bytes = (b) => b;
const service = {
  Pay: {
    path: "/shop.Checkout/Pay",
    requestStream: false,
    responseStream: false,
    requestSerialize: bytes,
    requestDeserialize: bytes,
    responseSerialize: bytes,
    responseDeserialize: bytes,
  },
};
const server = new grpc.Server();
server.addService(service, {
  Pay: (call, callback) => setTimeout(() => callback(null, Buffer.from("ok")), 2),
});
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) {
    console.error(`grpc app: ${err.message}`);
    process.exit(1);
  }
  console.error(`grpc app: listening on 127.0.0.1:${port}`);
});
process.on("SIGTERM", () => {
  console.error("grpc app: SIGTERM, tryShutdown");
  server.tryShutdown(() => process.exit(0));
});
