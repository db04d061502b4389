// Node 20 lacks Promise.withResolvers (ES2024; Node >= 22). js-libp2p 2.x needs it at run time
// through @libp2p/peer-store 11.2.x -> mortice 3.3.x -> it-queue (no package declares it in
// "engines"), and every 2.x release resolves to those versions. This is the standard definition,
// installed only where the runtime does not have it. Imported first by dial.mjs.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve, reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    }
  })
}
