"""The data layer: the metadata table (:mod:`~fastmask.data.table`), WebDataset shards written from it
(:mod:`~fastmask.data.shards`, read by :mod:`~fastmask.data.tar`), the streaming loader
(:mod:`~fastmask.data.loader`, its worker side :mod:`~fastmask.data.pass_stream`, its accounting
:mod:`~fastmask.data.stats`), a map-style dataset over the image files (:mod:`~fastmask.data.image_table`), the papers'
transforms (:mod:`~fastmask.data.transforms`), group balancing and the multi-attribute reduction
(:mod:`~fastmask.data.balance`) and the batch contract (:mod:`~fastmask.data.batch`). It imports nothing of fastmask
but :mod:`fastmask.util`."""
